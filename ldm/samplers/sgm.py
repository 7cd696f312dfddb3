"""generative-models' (sgm) samplers where they are not op for op k-diffusion's (ldm/samplers/k.py).

Specification: sgm/modules/diffusionmodules/sampling.py and sampling_utils.py (notation: ldm/samplers/__init__.py).
sgm ports k-diffusion's samplers; DPMPP2MSampler computes what k.py's sample_dpmpp_2m computes, operation for
operation, and the registry uses that (as do EulerEDMSampler / HeunEDMSampler with s_churn 0 and k.py's
sample_euler / sample_heun, but their churn differs). What differs is here:

- the ancestral samplers (EulerAncestralSampler, DPMPP2SAncestralSampler) draw randn_like(x) at EVERY step,
  the last (to sigma 0) too, and add it only where sigma_next > 0 (`torch.where`); k-diffusion draws only
  when it adds, so from the last step on the two consume the generator differently;
- the EDM samplers' churn (EDMSampler: noise drawn only where gamma > 0; k-diffusion draws at every step
  once churn is on);
- LinearMultistepSampler's coefficients: sgm integrates the Lagrange basis with scipy's quad over the float32
  sigmas (numpy 1.x promotes the node differences' numerator to float64, keeps the denominators t[i-j] - t[i-k]
  in float32); k.py integrates exactly in float64. Here the exact integral with float32 denominators, which
  is quad's value to float64 rounding (the integrand is a polynomial of degree < 4).

Per-sample tensors (s_in * sigma) as sgm, so the arithmetic is elementwise the same.
"""

from __future__ import annotations

import torch

from ldm.denoisers import append_dims
from ldm.noise import randn_like
from ldm.samplers.common import step_info as _info

CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}  # off


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """sampling_utils.py get_ancestral_step over per-sample tensors: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def to_d(x, sigma, denoised):
    return (x - denoised) / append_dims(sigma, x.ndim)


def _ancestral_noise(x, sigma_next, sigma_up, generator, s_noise):
    """AncestralSampler.ancestral_step: noise drawn always, added only where sigma_next > 0."""
    noise = randn_like(x, generator)
    return torch.where(append_dims(sigma_next, x.ndim) > 0.0, x + noise * s_noise * append_dims(sigma_up, x.ndim), x)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                           s_noise=1.0):
    """EulerAncestralSampler: an Euler step to sigma_down, then noise of std sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = s_in * sigmas[i], s_in * sigmas[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        denoised = denoiser(x, sigma, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        x = x + append_dims(sigma_down - sigma, x.ndim) * to_d(x, sigma, denoised)
        x = _ancestral_noise(x, sigma_next, sigma_up, generator, s_noise)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                              s_noise=1.0):
    """DPMPP2SAncestralSampler: DPM-Solver++(2S) to sigma_down (in lam = -log sigma, midpoint s = lam + h/2;
    Euler where sigma_down is 0), then noise of std sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = s_in * sigmas[i], s_in * sigmas[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        denoised = denoiser(x, sigma, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        x_euler = x + append_dims(sigma_down - sigma, x.ndim) * to_d(x, sigma, denoised)
        if torch.sum(sigma_down) < 1e-14:
            x = x_euler
        else:
            lam, lam_next = sigma.log().neg(), sigma_down.log().neg()
            h = lam_next - lam
            lam_mid = lam + 0.5 * h
            mult = [append_dims(m, x.ndim) for m in (lam_mid.neg().exp() / lam.neg().exp(), (-0.5 * h).expm1(),
                                                     lam_next.neg().exp() / lam.neg().exp(), (-h).expm1())]
            x_2 = mult[0] * x - mult[1] * denoised
            denoised_2 = denoiser(x_2, lam_mid.neg().exp(), **extra_args)
            x = torch.where(append_dims(sigma_down, x.ndim) > 0.0, mult[2] * x - mult[3] * denoised_2, x_euler)
        x = _ancestral_noise(x, sigma_next, sigma_up, generator, s_noise)
    return x


@torch.no_grad()
def sample_euler_edm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, heun=False, **churn):
    """EulerEDMSampler / HeunEDMSampler (heun=True; Euler on a step to 0) with sgm's churn: gamma =
    min(s_churn / steps, sqrt 2 - 1) where s_tmin <= sigma <= s_tmax, noise drawn only where gamma > 0 (off by
    default, as the demo)."""
    extra_args = {} if extra_args is None else extra_args
    churn = {**CHURN, **churn}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s_tmin, s_tmax = churn["s_tmin"], churn["s_tmax"]
        gamma = min(churn["s_churn"] / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma, sigma_next = s_in * sigmas[i], s_in * sigmas[i + 1]
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = randn_like(x, generator) * churn["s_noise"]
            x = x + eps * append_dims(sigma_hat**2 - sigma**2, x.ndim) ** 0.5
        denoised = denoiser(x, sigma_hat, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised, sigmas[i] * (gamma + 1.0)))
        d = to_d(x, sigma_hat, denoised)
        dt = append_dims(sigma_next - sigma_hat, x.ndim)
        euler = x + dt * d
        if not heun or torch.sum(sigma_next) < 1e-14:
            x = euler
            continue
        d_new = to_d(euler, sigma_next, denoiser(euler, sigma_next, **extra_args))
        x = torch.where(append_dims(sigma_next, x.ndim) > 0.0, x + (d + d_new) / 2.0 * dt, euler)
    return x


def linear_multistep_coeff(order, t, i, j):
    """sampling_utils.py linear_multistep_coeff: the integral over [t[i], t[i+1]] of the Lagrange basis
    polynomial of node t[i-j] on t[i], ..., t[i-order+1], with each denominator t[i-j] - t[i-k] a float32
    difference (sgm's nodes are a float32 numpy array). Integrated exactly, in u = tau - t[i]."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    t32 = torch.as_tensor(t, dtype=torch.float32)
    nodes = [float(t32[i - k]) - float(t32[i]) for k in range(order)]
    coeffs = [1.0]  # polynomial in u, lowest degree first
    for k in range(order):
        if k != j:
            denom = float(t32[i - j] - t32[i - k])
            shifted = [0.0] + coeffs
            coeffs = [(shifted[d] - nodes[k] * (coeffs[d] if d < len(coeffs) else 0.0)) / denom
                      for d in range(len(shifted))]
    h = float(t32[i + 1]) - float(t32[i])
    return sum(c * h ** (d + 1) / (d + 1) for d, c in enumerate(coeffs))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, order=4):
    """LinearMultistepSampler: Adams-Bashforth in sigma over the last `order` derivatives."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu()
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = s_in * sigmas[i]
        denoised = denoiser(x, sigma, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x
