"""Hooks: read, wrap or replace the output of any UNet block during sampling, addressed by its original
checkpoint name, with a step filter.

    from ldm import hooks, pipeline
    with hooks.BlockHooks(model) as h:
        h.wrap("middle_block.1", lambda output, call: 1.5 * output, steps=range(0, 10))
        images = pipeline.txt2img(model, prompt, sampler="ddim", steps=25)

Names are the module paths under the UNet, which are the checkpoint keys without `model.diffusion_model.`
(`input_blocks.4.1` is the SpatialTransformer of the fourth input block, `middle_block.1` the middle
transformer, `output_blocks.5.1.transformer_blocks.0.attn2` one cross-attention); the full key works too.

A hook function gets the block's output and a `Call`: the block's name, the step, the UNet timesteps of this
evaluation (B,), the module and its positional inputs. `wrap` hooks return the new output (None keeps it);
`observe` hooks only read (their return value is ignored, so they cannot change an image). Hooks of one block
run in the order they were added, each on the previous one's output.

The step is the index of the UNet evaluation in the run, counted from 0 when the `with` block is entered
(`reset()` starts again, for the next run in the same block), as DAAM and prompt-to-prompt count diffusers'
UNet calls. For the samplers that evaluate once per step (ddim, plms after its first step, dpm_solver, unipc,
euler, euler_a, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde) it is the sampler step; heun, dpm2, dpm2_a,
dpmpp_2s_a and dpmpp_sde evaluate twice per step but the last, plms twice in its first step. A sampler's
callback cannot tell the two apart: k-diffusion calls it after a step's FIRST evaluation. `steps` filters
by that index: None (every evaluation), an int, a collection of ints (a range) or a predicate on it; a hook
that wants noise levels reads `call.t`. One evaluation is one UNet call with guidance's [uncond, cond] batch
(outputs hold both halves); guidance run as two calls (unpairable conditionings) counts two. Hooks are torch
forward hooks, removed when the block is left; a torch.compile'd UNet (--compile) runs only hooks that were
added before it compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
from torch import nn

PREFIX = "model.diffusion_model."  # where the UNet's keys live in a checkpoint


class Call(NamedTuple):
    """One evaluation of a hooked block."""

    name: str  # the block's original name under the UNet
    step: int  # the UNet evaluation's index in the run (see the module docstring)
    t: torch.Tensor | None  # the UNet timesteps of this evaluation, (B,)
    module: nn.Module
    inputs: tuple  # the block's positional inputs


StepFilter = int | Collection[int] | Callable[[int], bool] | None


def _matches(steps: StepFilter, step: int) -> bool:
    if steps is None:
        return True
    if callable(steps):
        return bool(steps(step))
    if isinstance(steps, int):
        return step == steps
    return step in steps


def unet_of(model) -> nn.Module:
    """The UNet of a LatentDiffusion (its `.unet`), or the UNet itself."""
    return model.unet if hasattr(model, "unet") and isinstance(model.unet, nn.Module) else model


def block(unet: nn.Module, name: str) -> nn.Module:
    """The UNet block of an original name (with or without the checkpoint's `model.diffusion_model.`)."""
    path = name[len(PREFIX):] if name.startswith(PREFIX) else name
    try:
        return unet.get_submodule(path)
    except AttributeError:
        top = ", ".join(n for n, _ in unet.named_children())
        raise ValueError(f"the UNet has no block {name!r} (its top-level blocks: {top}; names are "
                         "checkpoint keys such as input_blocks.4.1 or middle_block.1)") from None


class BlockHooks:
    """Forward hooks on UNet blocks by original name, with a step filter (see the module docstring)."""

    def __init__(self, model):
        self.unet = unet_of(model)
        self.step, self._started = 0, False
        self.t = None
        self._hooks: list[tuple[str, Callable, StepFilter, bool]] = []
        self._handles: list = []

    def wrap(self, name: str, fn: Callable, steps: StepFilter = None) -> BlockHooks:
        """fn(output, call) -> the new output (None: unchanged), at the steps `steps` selects."""
        return self._add(name, fn, steps, replaces=True)

    def observe(self, name: str, fn: Callable, steps: StepFilter = None) -> BlockHooks:
        """fn(output, call) reads the block's output; what it returns is ignored."""
        return self._add(name, fn, steps, replaces=False)

    def scale(self, name: str, factor: float, steps: StepFilter = None) -> BlockHooks:
        """Multiply a block's output by `factor` (the README's example)."""
        return self.wrap(name, lambda output, call: output * factor, steps)

    def reset(self) -> None:
        """Step 0 again, for the next sampling run inside the same `with` block."""
        self.step = 0
        self._started = False

    def _add(self, name, fn, steps, replaces):
        module = block(self.unet, name)  # fails now, not at the first step, for a wrong name
        entry = (name[len(PREFIX):] if name.startswith(PREFIX) else name, fn, steps, replaces)
        self._hooks.append(entry)
        if self._handles:
            self._handles.append(module.register_forward_hook(self._hook(*entry)))
        return self

    def _hook(self, name, fn, steps, replaces):
        def hook(module, inputs, output):
            if not _matches(steps, self.step):
                return None
            result = fn(output, Call(name, self.step, self.t, module, inputs))
            return result if replaces else None
        return hook

    def _evaluation(self, module, args, kwargs):
        # a UNet call begins: the next step, except for the first call after entering or reset()
        self.step += self._started
        self._started = True
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        self.t = torch.as_tensor(t)

    def __enter__(self) -> BlockHooks:
        if self._handles:
            raise RuntimeError("these hooks are already active")
        self.reset()
        self._handles = [self.unet.register_forward_pre_hook(self._evaluation, with_kwargs=True)]
        self._handles += [block(self.unet, name).register_forward_hook(self._hook(name, fn, steps, replaces))
                          for name, fn, steps, replaces in self._hooks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
