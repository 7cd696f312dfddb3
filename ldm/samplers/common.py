"""What every sampler shares: the per-step record handed to `callback`, and the ODE derivative."""

from __future__ import annotations


def step_info(x, i, sigma, denoised, sigma_hat=None) -> dict:
    """k-diffusion's callback dict: the sample before step i, its noise level (sigma_hat: the level the
    denoiser saw, above sigma when churn adds noise first) and the denoised estimate."""
    return {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
            "denoised": denoised}


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma = (x - denoised) / sigma (Karras et al. 2022, eq. 4 with s = 1)."""
    return (x - denoised) / sigma
