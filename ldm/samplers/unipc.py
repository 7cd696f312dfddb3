"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor-corrector, variant B(h) = expm1(-h) ("bh2"),
data prediction, multistep of order up to 3, as the reference code (github.com/wl-zhao/UniPC uni_pc.py,
UniPC.multistep_uni_pc_bh_update and sample(method="multistep")).

In VE space with lambda = -log sigma, h = lambda_next - lambda and D_k the denoised estimates:
    predictor (UniP):  x_next = (sigma_next / sigma) x - expm1(-h) D_0 - B(h) sum_k rho_p[k] D1_k
    corrector (UniC):  the same from x with rho_c, adding the estimate D_next at the predicted x_next;
                       D_next is then reused as the model value at the corrected point (no extra call).
D1_k = (D_{-k} - D_0) / r_k with r_k = (lambda_{-k} - lambda) / h; the rho solve R rho = b, R[i] = r^i,
b[i] = (i+1)! phi_{i+2}(-h) / B(h) (order 2 predictor and order 1 corrector use rho = 1/2, as the reference).
As the reference: the first steps ramp the order up, the last steps ramp it down (lower_order_final),
and the last step skips the corrector, so a run of n steps costs n model calls.
"""

from __future__ import annotations

import math

import torch

from ldm.samplers.common import step_info

def _rhos(rks: list[float], hh: float, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the predictor (length order-1) and the corrector (length order), in float64."""
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial, rows, b = 1, [], []
    r = torch.tensor(rks, dtype=torch.float64)
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.tensor(b, dtype=torch.float64)
    rhos_p = torch.tensor([0.5], dtype=torch.float64) if order == 2 else (
        torch.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else torch.zeros(0, dtype=torch.float64))
    rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
    return rhos_p, rhos_c


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, extra_args=None, callback=None, order=3, lower_order_final=True):
    """UniPC-bh2 multistep. A final sigma of 0 is reached with a first-order step (x = denoised)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    lambdas = (-sigmas.detach().cpu().double().log()).tolist()
    n = len(sigmas) - 1
    history = [denoiser(x, sigmas[0] * s_in, **extra_args)]  # denoised estimates, newest last
    for step in range(1, n + 1):
        i = step - 1
        if callback is not None:
            callback(step_info(x, i, sigmas[i], history[-1]))
        denoised = history[-1]
        if sigmas[step] == 0:
            x = denoised
            break
        step_order = min(order, step, n + 1 - step) if lower_order_final else min(order, step)
        h = lambdas[step] - lambdas[i]
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, step_order)]
        d1s = [(history[-(k + 1)] - denoised) / rk for k, rk in enumerate(rks, start=1)]
        rhos_p, rhos_c = _rhos(rks + [1.0], -h, step_order)
        b_h = math.expm1(-h)
        x_base = (sigmas[step] / sigmas[i]) * x - math.expm1(-h) * denoised
        x_next = x_base - b_h * sum((float(rho) * d1 for rho, d1 in zip(rhos_p, d1s)), torch.zeros_like(x))
        if step == n:  # no corrector on the last step; its model value is never needed
            x = x_next
            break
        denoised_next = denoiser(x_next, sigmas[step] * s_in, **extra_args)
        correction = sum((float(rho) * d1 for rho, d1 in zip(rhos_c[:-1], d1s)), torch.zeros_like(x))
        x = x_base - b_h * (correction + float(rhos_c[-1]) * (denoised_next - denoised))
        history = (history + [denoised_next])[-order:]
    return x
