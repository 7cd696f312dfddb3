"""The k-diffusion samplers (k-diffusion 0.1.1 sampling.py, Karras et al. 2022 notation), default options.

All integrate the probability-flow ODE dx/dsigma = d = (x - denoised) / sigma or its SDE variants on a VE
sigma list ending in 0 (notation: ldm/samplers/__init__.py; lambda = -log sigma is `lam`). Churn (s_churn,
s_tmin, s_tmax, s_noise of euler, heun, dpm_2; Karras et al. 2022, Algorithm 2) is off by default. Like
k-diffusion, these three draw that churn noise at every step even when churn is off. The
ancestral samplers step deterministically down to sigma_down, then add noise of std sigma_up
(get_ancestral_step, eta 1). Noise comes from `generator` through a noise sampler (sigma, sigma_next) ->
N(0, I); the SDE samplers default to BrownianNoise, equal in law to k-diffusion's Brownian tree.
"""

from __future__ import annotations

import torch

from ldm.noise import randn_like
from ldm.samplers.common import step_info as _info
from ldm.samplers.common import to_d
from ldm.samplers.noise import BrownianNoise, default_noise_sampler

CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}  # off


def get_ancestral_step(sigma, sigma_next, eta=1.0):
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma_next^2 (for eta 1, the DDPM posterior)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _churn(x, sigmas, i, generator, s_churn, s_tmin, s_tmax, s_noise):
    """(x, sigma_hat): Karras et al. 2022 Algorithm 2 lines 4-6, raise the noise level of step i by a factor
    1 + gamma with fresh noise. As k-diffusion 0.1.1, the noise is drawn at EVERY step, also where gamma is 0
    (churn off, or outside [s_tmin, s_tmax]), so a run consumes `generator` as k-diffusion consumes its RNG;
    with gamma 0 it is unused and sigma_hat equals sigmas[i]."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    eps = randn_like(x, generator) * s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **churn):
    """Euler steps (Karras et al. 2022, Algorithm 2 without the Heun correction); churn off by default."""
    extra_args = {} if extra_args is None else extra_args
    churn = {**CHURN, **churn}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, generator, **churn)
        denoised = denoiser(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised, sigma_hat))
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, noise_sampler=None):
    """Euler step to sigma_down, then noise sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **churn):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the final step to 0."""
    extra_args = {} if extra_args is None else extra_args
    churn = {**CHURN, **churn}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, generator, **churn)
        denoised = denoiser(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoiser, x, sigma, sigma_to, d, s_in, extra_args):
    """DPM-Solver-2-like midpoint step: the derivative at the log-midpoint of [sigma, sigma_to]."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, **extra_args))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **churn):
    """Midpoint steps in log sigma ("inspired by DPM-Solver-2"); Euler on the final step to 0; churn off by
    default."""
    extra_args = {} if extra_args is None else extra_args
    churn = {**CHURN, **churn}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, generator, **churn)
        denoised = denoiser(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm2_step(denoiser, x, sigma_hat, sigmas[i + 1], d, s_in, extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, noise_sampler=None):
    """dpm_2 midpoint step to sigma_down, then noise sigma_up (Euler, no noise, when sigma_down is 0)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoiser, x, sigmas[i], sigma_down, d, s_in, extra_args)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def linear_multistep_coeff(order, t, i, j):
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial of node t[i-j] on the nodes
    t[i], ..., t[i-order+1]. k-diffusion integrates numerically (scipy quad); the integrand is a polynomial
    of degree order-1, integrated here exactly, in the variable u = tau - t[i] for conditioning."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")
    nodes = [t[i - k] - t[i] for k in range(order)]
    coeffs = [1.0]  # polynomial in u, lowest degree first
    for k in range(order):
        if k != j:
            denom = nodes[j] - nodes[k]
            shifted = [0.0] + coeffs
            coeffs = [(shifted[d] - nodes[k] * (coeffs[d] if d < len(coeffs) else 0.0)) / denom
                      for d in range(len(shifted))]
    h = t[i + 1] - t[i]
    return sum(c * h ** (d + 1) / (d + 1) for d, c in enumerate(coeffs))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma, variable step) of up to `order` derivatives."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_list = sigmas.detach().cpu().double().tolist()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_list, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                              eta=1.0, noise_sampler=None):
    """DPM-Solver++(2S) (Lu et al. 2022) single-step midpoint steps to sigma_down, then noise sigma_up.
    In lam = -log sigma: x_mid = (sigma_mid / sigma) x - expm1(-h/2) denoised, then
    x = (sigma_down / sigma) x - expm1(-h) denoised(x_mid)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = -sigmas[i].log(), -sigma_down.log()
            h = lam_next - lam
            lam_mid = lam + h / 2
            x_2 = ((-lam_mid).exp() / (-lam).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoiser(x_2, (-lam_mid).exp() * s_in, **extra_args)
            x = ((-lam_next).exp() / (-lam).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                     noise_sampler=None, r=0.5):
    """DPM-Solver++ (stochastic): two stochastic exponential-integrator stages per step, the second using
    the denoised estimate at lam + r h. Its two noises of a step overlap ([sigma, sigma_mid] and
    [sigma, sigma_next]) and must be correlated as increments of one Brownian motion: BrownianNoise."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = BrownianNoise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    sigma_of, lam_of = (lambda lam: lam.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        lam, lam_next = lam_of(sigmas[i]), lam_of(sigmas[i + 1])
        lam_mid = lam + (lam_next - lam) * r
        # stage 1: ancestral exponential step to lam_mid
        sd, su = get_ancestral_step(sigma_of(lam), sigma_of(lam_mid), eta)
        lam_down = lam_of(sd)
        x_2 = (sigma_of(lam_down) / sigma_of(lam)) * x - (lam - lam_down).expm1() * denoised
        x_2 = x_2 + noise_sampler(sigma_of(lam), sigma_of(lam_mid)) * su
        denoised_2 = denoiser(x_2, sigma_of(lam_mid) * s_in, **extra_args)
        # stage 2: ancestral exponential step to lam_next with the mixed estimate
        sd, su = get_ancestral_step(sigma_of(lam), sigma_of(lam_next), eta)
        lam_down = lam_of(sd)
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (sigma_of(lam_down) / sigma_of(lam)) * x - (lam - lam_down).expm1() * denoised_d
        x = x + noise_sampler(sigma_of(lam), sigma_of(lam_next)) * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, lower_order_final=False):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): multistep, the previous denoised estimate gives the
    second-order term; first order on the first step and on a final step to 0. `lower_order_final` (the
    original `--dpm_solver`, Stability's DPMSolverSampler: multistep, order 2, lower_order_final=True) also
    makes the last step first order when the run has fewer than 15 steps."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    denoised_prev = None
    for i in range(n):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigmas[i], denoised))
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lam_next - lam
        if denoised_prev is None or sigmas[i + 1] == 0 or (lower_order_final and n < 15 and i == n - 1):
            denoised_d = denoised
        else:
            r = (lam - (-sigmas[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        x = ((-lam_next).exp() / (-lam).exp()) * x - (-h).expm1() * denoised_d
        denoised_prev = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: x = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) denoised + a second-order
    term + sigma_next sqrt(1 - e^{-2 eta h}) z; the final step to 0 is x = denoised. The second-order term
    of solver_type "midpoint" (the default) is (1 - e^{-(1+eta) h}) / (2 r) (D - D_prev); "heun"'s is
    ((1 - e^{-(1+eta) h}) / ((1+eta) h) - 1) / r (D - D_prev), with the sign of k-diffusion's expression."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = BrownianNoise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigma, denoised))
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if denoised_prev is not None:
                r = h_prev / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - denoised_prev)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - denoised_prev)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt()
        denoised_prev, h_prev = denoised, (h if sigma_next > 0 else None)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE: as 2M SDE with a third-order multistep correction from two previous
    estimates (phi_2, phi_3 of h (1 + eta)); the final step to 0 is x = denoised."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = BrownianNoise(x, generator) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback(_info(x, i, sigma, denoised))
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x
