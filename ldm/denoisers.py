"""The sampler's view of a diffusion model: `denoiser(x, sigma, **extra_args) -> denoised`, in VE space.

A Denoiser wraps a UNet trained on the discrete VP schedule (as k-diffusion external.py CompVisDenoiser /
CompVisVDenoiser): the VE sample x at noise level sigma is the VP sample x * c_in at the timestep t(sigma),
and the UNet's eps or v output is turned into the denoised estimate

    eps:  denoised = x + c_out * eps                  c_out = -sigma,               c_in = 1 / sqrt(sigma^2 + 1)
    v:    denoised = c_skip * x + c_out * v           c_skip = 1 / (sigma^2 + 1),   c_out = -sigma / sqrt(sigma^2 + 1)

so no sampler ever branches on the parameterization. CFGDenoiser wraps any denoiser with classifier-free
guidance (Ho & Salimans 2022): one batched call on [uncond, cond], then uncond + scale * (cond - uncond).
Guidance on `denoised` equals the originals' guidance on eps or v, since denoised is affine in the UNet
output with the same x for both halves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm import schedules

PARAMETERIZATIONS = ("eps", "v")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, to broadcast per-sample scalars."""
    return v[(...,) + (None,) * (ndim - v.ndim)]


class Denoiser:
    """eps- or v-prediction model -> VE denoiser.

    model_fn(x, t, cond, **extra) is called as `model.apply_model` (ldm/models/latent_diffusion.py): x the VP
    input, t float timesteps of shape (B,), `cond` and any other keyword arguments passed through untouched
    (the conditioning dict: context, inpainting channels, class / vector, control).

    Timesteps: by default the FRACTIONAL timestep of sigma by log-sigma interpolation of the discrete
    schedule (CompVisDenoiser); `quantize` rounds to the nearest training timestep; interpolation="log_alpha"
    is the continuous-time mapping of Stability's DPM-Solver (log alpha linear between timesteps).

    `quantize_sigma` is generative-models' DiscreteDenoiser (sgm denoiser.py, SDXL): every call replaces sigma
    by the nearest entry of `sigmas` (smallest |sigma - sigmas[n]| in float32, the first on a tie, as its
    sigma_to_idx), computes c_in and c_out from that QUANTIZED sigma and hands the UNet the integer index n.
    The sampler's own arithmetic keeps the unquantized sigma. `sigmas`: the ascending discrete table (default
    sqrt((1 - a) / a) of alphas_cumprod; sgm rounds it differently, schedules.sgm_sigmas).
    """

    def __init__(self, model_fn: Callable, alphas_cumprod: torch.Tensor, parameterization: str = "eps",
                 quantize: bool = False, interpolation: str = "log_sigma", quantize_sigma: bool = False,
                 sigmas: torch.Tensor | None = None):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")
        if interpolation not in schedules.INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(schedules.INTERPOLATIONS)}")
        self.model_fn = model_fn
        self.alphas_cumprod = alphas_cumprod
        self.parameterization = parameterization
        self.quantize = quantize
        self.interpolation = interpolation
        self.quantize_sigma = quantize_sigma
        # ascending in t, float32, CPU
        self.sigmas = (schedules.discrete_sigmas(alphas_cumprod) if sigmas is None
                       else sigmas.detach().to("cpu", torch.float32))

    def replace(self, **changes) -> Denoiser:
        """A copy with other timestep options (quantize, interpolation); the sampler registry uses it to
        hand the UNet exactly the timesteps of the original samplers."""
        options = dict(parameterization=self.parameterization, quantize=self.quantize,
                       interpolation=self.interpolation, quantize_sigma=self.quantize_sigma, sigmas=self.sigmas)
        options.update(changes)
        return Denoiser(self.model_fn, self.alphas_cumprod, **options)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedules.sigma_to_t(sigma, self.sigmas, self.quantize, self.interpolation)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, **extra) -> torch.Tensor:
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] != x.shape[0]):
            raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},) like x's batch, got "
                             f"{tuple(sigma.shape)}")
        if self.quantize_sigma:
            index = schedules.nearest_sigma_index(sigma.reshape(-1), self.sigmas)
            t, sigma = index.to(x.device), self.sigmas[index].reshape(sigma.shape)
        else:
            t = self.sigma_to_t(sigma.reshape(-1)).to(device=x.device, dtype=torch.float32)
        sigma = append_dims(sigma.to(x), x.ndim)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        out = self.model_fn(x * c_in, t, cond, **extra)
        if self.parameterization == "eps":
            return x + out * -sigma
        c_skip, c_out = 1 / (sigma**2 + 1), -sigma * c_in
        return out * c_out + x * c_skip


def _double(value):
    """[value, value] along the batch, for extra arguments shared by both halves of a CFG batch."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v) for v in value)
    return torch.cat([value, value])


def _pair(uncond, cond):
    """[uncond, cond] along the batch (tensors, or dicts / lists of them as in ddim.py p_sample_ddim)."""
    if isinstance(cond, dict):
        return {k: _pair(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_pair(u, c) for u, c in zip(uncond, cond))
    return torch.cat([uncond, cond])


def pairable(uncond, cond) -> bool:
    """Whether the two conditionings can run as one batch: the same structure and the same shapes but the
    batch. Not so for prompts of different lengths (A1111 chunks) or a branch without a ControlNet (guess mode)."""
    if isinstance(cond, dict):
        return isinstance(uncond, dict) and uncond.keys() == cond.keys() and all(
            pairable(uncond[k], cond[k]) for k in cond)
    if isinstance(cond, (list, tuple)):
        return isinstance(uncond, (list, tuple)) and len(uncond) == len(cond) and all(
            pairable(u, c) for u, c in zip(uncond, cond))
    if isinstance(cond, torch.Tensor):
        return isinstance(uncond, torch.Tensor) and uncond.shape[1:] == cond.shape[1:]
    return cond is None and uncond is None


class CFGDenoiser:
    """Classifier-free guidance around a denoiser: uncond + scale * (cond - uncond).

    `cond` / `uncond` are given at construction or per call (a call's value wins). As the originals
    (ddim.py p_sample_ddim, dpm_solver.py model_wrapper) the two branches run as ONE batch in the order
    [uncond, cond], and scale 1 (or no uncond) skips the unconditional branch. Other extra arguments are shared
    by both halves. Two conditionings that cannot share a batch (`pairable`), or `batched=False`, run as two
    calls, cond first (ControlNet's ddim_hacked.py; A1111 for prompts of different chunk counts); kernels
    block by batch size, so the two forms agree to float rounding, not bit for bit. skip_at_one=False guides at
    scale 1 as well (generative-models' VanillaCFG: uncond + 1 * (cond - uncond) is not cond bit for bit).
    """

    def __init__(self, denoiser, scale: float = 1.0, *, cond=None, uncond=None, batched: bool = True,
                 skip_at_one: bool = True):
        self.denoiser, self.scale, self.cond, self.uncond = denoiser, scale, cond, uncond
        self.batched = batched
        self.skip_at_one = skip_at_one  # sgm's VanillaCFG guides at scale 1 too: skip_at_one=False

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.denoiser.alphas_cumprod

    @property
    def sigmas(self) -> torch.Tensor:
        return self.denoiser.sigmas

    def replace(self, **changes) -> CFGDenoiser:
        return CFGDenoiser(self.denoiser.replace(**changes), self.scale, cond=self.cond, uncond=self.uncond,
                           batched=self.batched, skip_at_one=self.skip_at_one)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, uncond=None, **extra_args):
        cond = self.cond if cond is None else cond
        uncond = self.uncond if uncond is None else uncond
        if (self.scale == 1.0 and self.skip_at_one) or uncond is None:
            if self.scale != 1.0 or not self.skip_at_one:
                raise ValueError(f"guidance scale {self.scale} needs an unconditional conditioning")
            return self.denoiser(x, sigma, cond=cond, **extra_args)
        if self.batched and pairable(uncond, cond):
            extra = {k: _double(v) for k, v in extra_args.items()}
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_pair(uncond, cond), **extra)
            denoised_uncond, denoised_cond = both.chunk(2)
        else:
            denoised_cond = self.denoiser(x, sigma, cond=cond, **extra_args)
            denoised_uncond = self.denoiser(x, sigma, cond=uncond, **extra_args)
        return denoised_uncond + self.scale * (denoised_cond - denoised_uncond)
