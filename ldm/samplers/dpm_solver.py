"""The original `--dpm_solver`: Stability's DPMSolverSampler (ldm/models/diffusion/dpm_solver/sampler.py), i.e.
DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) with method="multistep", order=2, predict_x0=True,
skip_type="time_uniform", lower_order_final=True, on the discrete noise schedule.

With lambda = log(alpha / sigma_VP) = -log sigma (VE) and h = lambda_next - lambda, the multistep update of
dpm_solver.py multistep_dpm_solver_second_update (solver_type "dpm_solver") divided by alpha_next is

    x_next = (sigma_next / sigma) x - expm1(-h) (D + (D - D_prev) / (2 r)),   r = h_prev / h

and the first step (dpm_solver_first_update) drops the difference term. The time grid and the fractional
timesteps the UNet receives come from schedules.dpm_solver_sigma_list and a denoiser with
interpolation="log_alpha" (the registry sets both).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_dpm_solver(denoiser, x, sigmas, *, extra_args=None, callback=None, lower_order_final=True):
    """DPM-Solver++(2M). `lower_order_final`: as the original, the last step is first order when the run has
    fewer than 15 steps. A final sigma of 0 also gets a first-order step (x = denoised), as dpmpp_2m."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    denoised_prev, h_prev = None, None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        h = sigma.log() - sigma_next.log()
        first_order = (denoised_prev is None or sigma_next == 0
                       or (lower_order_final and n < 15 and i == n - 1))
        d = denoised if first_order else denoised + (denoised - denoised_prev) / (2 * (h_prev / h))
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        denoised_prev, h_prev = denoised, h
    return x
