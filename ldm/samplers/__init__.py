"""Samplers: stateless functions `sample_NAME(denoiser, x, sigmas, *, extra_args, callback, generator, ...)`
over a VE denoiser, plus the registry SAMPLERS and the one entry point `sample(...)` the pipeline uses.

Notation (all samplers, VE space as k-diffusion; the originals' VP quantities in brackets)
  alphas_cumprod  a_n, n = 0..N-1, the model's discrete schedule          [ddpm.py register_schedule]
  sigma           noise level, sigma^2 = (1 - a) / a; x = x_0 + sigma * noise
  sigmas          the sigma list a run steps through, descending, often ending in 0
  x               the VE sample; x_VP = x / sqrt(1 + sigma^2)            [x_t, img]
  t               the (fractional) UNet timestep of sigma (Denoiser.sigma_to_t)
  denoised        D(x, sigma), the estimate of x_0                      [pred_x0]
  eps             (x - denoised) / sigma, the noise estimate             [e_t]
  d               dx/dsigma = eps, the probability-flow ODE derivative  (Karras et al. 2022, eq. 4)
  lambda, h       lambda = -log sigma (half log-SNR), h = lambda_next - lambda   [DPM-Solver]
  sigma_up/down   ancestral split of a step: down deterministically, then noise of std sigma_up
  eta             amount of fresh noise (DDIM's eta; the ancestral/SDE samplers use eta = 1)

Where runs start (`sample`): the originals' family (ddpm, ddim, plms, dpm_solver, unipc) starts from the VP
x_T at their first timestep, i.e. x = x_T * sqrt(1 + sigmas[0]^2), and their runs end at sigma > 0
(alphas_cumprod[0]); the result is converted back to VP, the latent the originals decode. The k-family
starts from x_T * sigmas[0] and ends at sigma = 0, where VE = VP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ldm import schedules
from ldm.samplers.compvis import sample_ddim, sample_ddpm, sample_plms
from ldm.samplers.dpm_solver import sample_dpm_solver
from ldm.samplers.k import (sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                            sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler,
                            sample_euler_ancestral, sample_heun, sample_lms)
from ldm.samplers.noise import randn_like
from ldm.samplers.unipc import sample_unipc

ORIGINAL_SCHEDULES = ("uniform", "quad")  # DDIM discretizations; for dpm_solver/unipc: time_uniform/quadratic


@dataclass(frozen=True)
class SamplerSpec:
    """fn: the sampler; grid: "ddim" | "ddpm" | "dpm_solver" (the originals' grids) or "k" (sigma lists of
    schedules.K_SCHEDULES); stochastic: whether fn draws noise (takes `generator`); timing: Denoiser options
    that make the UNet see the original's timesteps (integers for the CompVis samplers, DPM-Solver's
    continuous time for dpm_solver/unipc; the k-family keeps the denoiser's own, fractional by default)."""
    fn: Callable
    grid: str
    stochastic: bool = False
    timing: dict = field(default_factory=dict)

    @property
    def valid_schedules(self) -> tuple[str, ...]:
        return schedules.K_SCHEDULES if self.grid == "k" else ORIGINAL_SCHEDULES

    @property
    def original(self) -> bool:
        return self.grid != "k"


_INTEGER = {"quantize": True}
_CONTINUOUS = {"quantize": False, "interpolation": "log_alpha"}
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, "ddpm", True, _INTEGER),
    "ddim": SamplerSpec(sample_ddim, "ddim", True, _INTEGER),
    "plms": SamplerSpec(sample_plms, "ddim", False, _INTEGER),
    "dpm_solver": SamplerSpec(sample_dpm_solver, "dpm_solver", False, _CONTINUOUS),
    "unipc": SamplerSpec(sample_unipc, "dpm_solver", False, _CONTINUOUS),
    "euler": SamplerSpec(sample_euler, "k"),
    "euler_a": SamplerSpec(sample_euler_ancestral, "k", True),
    "heun": SamplerSpec(sample_heun, "k"),
    "dpm2": SamplerSpec(sample_dpm_2, "k"),
    "dpm2_a": SamplerSpec(sample_dpm_2_ancestral, "k", True),
    "lms": SamplerSpec(sample_lms, "k"),
    "dpmpp_2s_a": SamplerSpec(sample_dpmpp_2s_ancestral, "k", True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "k"),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "k", True),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "k", True),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde, "k", True),
}


def sigma_list(spec: SamplerSpec, sigmas: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    """The full sigma list of a run of `steps` over the discrete `sigmas`."""
    if schedule not in spec.valid_schedules:
        raise ValueError(f"unknown schedule {schedule!r} for this sampler; valid: {', '.join(spec.valid_schedules)}")
    if spec.grid == "ddim":
        return schedules.ddim_sigma_list(sigmas, steps, schedule)
    if spec.grid == "ddpm":
        return schedules.ddpm_sigma_list(sigmas, steps, schedule)
    if spec.grid == "dpm_solver":
        skip_type = "time_uniform" if schedule == "uniform" else "time_quadratic"
        return schedules.dpm_solver_sigma_list(sigmas, steps, skip_type)
    return schedules.k_sigma_list(sigmas, steps, schedule)


def _start(spec, sigmas, x_T, init_latent, strength, steps, generator):
    """(x in VE space, the sigma list to run). img2img runs the last t_enc = int(strength * steps) steps.
    On the DDIM grid (ddim, plms) as CompVis scripts/img2img.py: stochastic_encode at DDIM index t_enc,
    i.e. VP noising to the level just ABOVE the first decoded step, then decode; every other sampler
    noises to the first level it runs from (k-diffusion's x = init + noise * sigma)."""
    if init_latent is None:
        if strength is not None:
            raise ValueError("strength is given without an init_latent")
        return x_T * (sigmas[0] if not spec.original else (1 + sigmas[0] ** 2).sqrt()), sigmas
    if strength is None or not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img needs a strength in [0, 1], got {strength}")
    noise = randn_like(init_latent, generator) if x_T is None else x_T
    t_enc = int(strength * steps)
    tail = sigmas[len(sigmas) - 1 - min(t_enc, len(sigmas) - 1):]
    if not spec.original:
        return init_latent + noise * tail[0], tail
    sigma_enc = tail[0]
    if spec.grid == "ddim":
        # ddim_alphas[t_enc]; strength 1 on a grid of exactly `steps` levels has none above (the original's
        # IndexError) and is noised to the top level instead
        sigma_enc = sigmas[max(len(sigmas) - 2 - t_enc, 0)]
    a_enc = 1 / (1 + sigma_enc**2)
    x_vp = a_enc.sqrt() * init_latent + (1 - a_enc).sqrt() * noise
    return x_vp * (1 + tail[0] ** 2).sqrt(), tail


def _progress(callback, total, disable):
    if disable:
        return callback, None
    from tqdm.auto import tqdm  # only the entry point draws a bar; the samplers import only torch

    bar = tqdm(total=total)

    def step(info):
        bar.update(1)
        if callback is not None:
            callback(info)
    return step, bar


@torch.no_grad()
def sample(denoiser, x_T: torch.Tensor | None, *, sampler: str = "ddim", steps: int = 50,
           schedule: str = "uniform", eta: float = 0.0, generator: torch.Generator | None = None,
           init_latent: torch.Tensor | None = None, strength: float | None = None,
           callback: Callable | None = None, disable: bool = False, extra_args: dict | None = None,
           ) -> torch.Tensor:
    """Run `sampler` for `steps` and return the VP latent the original would decode.

    denoiser: a Denoiser / CFGDenoiser (needs .sigmas and .replace); extra_args go to it (cond, uncond,
    c_concat). x_T: N(0, I) of the latent shape; for img2img (init_latent + strength) it is the
    forward-noising noise, drawn from `generator` if None. callback(info) once per step with k-diffusion's
    dict (x, i, sigma, sigma_hat, denoised); disable turns the progress bar off.
    schedule: "uniform" | "quad" for the originals' family (DDIM discretization; dpm_solver/unipc: time
    uniform / quadratic), "uniform" | "karras" | "exponential" for the k-family. eta: DDIM's eta, for ddim
    only (plms rejects eta != 0 as the original; the ancestral and SDE k-samplers always use eta 1).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    if eta and sampler != "ddim":
        raise ValueError(f"eta applies to ddim only, got eta={eta} for {sampler}")
    if x_T is None and init_latent is None:
        raise ValueError("x_T is needed unless init_latent is given")
    full = sigma_list(spec, denoiser.sigmas, steps, schedule)
    denoiser = denoiser.replace(**spec.timing) if spec.timing else denoiser
    reference = init_latent if init_latent is not None else x_T
    x, sigmas = _start(spec, full.to(reference.device), x_T, init_latent, strength, steps, generator)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    if spec.stochastic:
        kwargs["generator"] = generator
    step_callback, bar = _progress(callback, len(sigmas) - 1, disable)
    try:
        x = spec.fn(denoiser, x, sigmas, extra_args=extra_args, callback=step_callback, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return x / (1 + sigmas[-1] ** 2).sqrt()
