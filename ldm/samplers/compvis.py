"""The CompVis samplers (ddpm.py p_sample, ddim.py, plms.py), rewritten on a VE sigma list.

The originals step x_t (VP) between alphas_cumprod a and a_prev. Dividing each update by sqrt(a_prev) gives
the VE form used here, with sigma^2 = (1 - a) / a and eps = (x - denoised) / sigma:

    DDIM   x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - s^2) eps + s z
           with s = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))
      ->   x_next = denoised + sigma_down eps + sigma_up z,  sigma_up = s / sqrt(a_prev)
                                                            = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2)
    DDPM   the posterior q(x_prev | x_t, x_0 = denoised)  (ddpm.py q_posterior)
      ->   mean = r x + (1 - r) denoised,  variance = sigma_next^2 (1 - r),  r = sigma_next^2 / sigma^2

The registry (ldm/samplers/__init__.py) hands these the originals' grids and converts x_T in and the result
out of VE space, so they reproduce the originals up to float rounding.
"""

from __future__ import annotations

import torch

from ldm.noise import randn_like
from ldm.samplers.common import step_info


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                clip_denoised=False):
    """Ancestral DDPM (Ho et al. 2020): draw x at each next level from the Gaussian posterior given the
    denoised estimate. With the N training levels then 0 it is LatentDiffusion.p_sample_loop; between
    subsampled levels it uses the general posterior of the two levels (equal to DDIM with eta = 1).
    `clip_denoised` clamps the estimate to [-1, 1] as p_mean_variance does when the model's
    clip_denoised is set (the original DDPM class defaults to True; p_sample itself defaults to False)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if clip_denoised:
            denoised = denoised.clamp(-1.0, 1.0)
        if callback is not None:
            callback(step_info(x, i, sigma, denoised))
        r = sigma_next**2 / sigma**2
        x = r * x + (1 - r) * denoised
        noise = randn_like(x, generator)  # drawn at every step, the last too, as p_sample's noise_like
        if sigma_next > 0:  # no noise on the last step to x_0, as p_sample's nonzero_mask
            x = x + sigma_next * (1 - r).sqrt() * noise
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12) as ddim.py p_sample_ddim. eta = 0 is deterministic (an Euler step
    of dx/dsigma = eps); eta = 1 is the DDPM posterior. As the original, the step noise is drawn at every step,
    also when eta = 0 multiplies it by zero: a run consumes `generator` as the original consumes its RNG, so the
    next batch of a run starts from the same numbers."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback(step_info(x, i, sigma, denoised))
        eps = (x - denoised) / sigma
        sigma_up = eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = denoised + sigma_down * eps
        noise = randn_like(x, generator)
        if sigma_up > 0:
            x = x + sigma_up * noise
    return x


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """PLMS (Liu et al. 2022, "pseudo numerical methods") as plms.py: a DDIM step (eta 0) whose eps is the
    Adams-Bashforth combination of the current and up to three previous eps. The first step has no history
    and uses the "pseudo improved Euler" step: the average of eps here and eps after a trial DDIM step
    (a Heun step in sigma), one extra model call. Deterministic, but as plms.py's get_x_prev_and_pred_x0 it
    draws (and multiplies by zero) step noise for every DDIM step it takes, the trial step too, so that a run
    consumes `generator` as the original consumes its RNG."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    old_eps = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback(step_info(x, i, sigma, denoised))
        eps = (x - denoised) / sigma
        if not old_eps:
            x_next = x + (sigma_next - sigma) * eps
            # plms.py evaluates the trial point at the NEXT grid timestep, time_range[min(i + 1, n - 1)]:
            # for a one-step run that is the current timestep while x_next sits at sigma_next. Rescale so the
            # UNet sees the original's VP input at that timestep (a no-op whenever sigma_eval == sigma_next).
            sigma_eval = sigmas[min(i + 1, n - 1)]
            x_eval = x_next * ((1 + sigma_eval**2) / (1 + sigma_next**2)).sqrt()
            randn_like(x, generator)  # the trial step's unused noise
            eps_next = (x_eval - denoiser(x_eval, sigma_eval * s_in, **extra_args)) / sigma_eval
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + (sigma_next - sigma) * eps_prime
        randn_like(x, generator)  # the step's unused noise (eta 0)
        old_eps = (old_eps + [eps])[-3:]
    return x
